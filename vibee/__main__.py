from vibee.cli import main

main()

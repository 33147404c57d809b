from vitport.cli import main

main()

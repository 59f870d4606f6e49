from nnhealth.cli import main

main()

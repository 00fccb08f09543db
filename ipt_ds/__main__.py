from ipt_ds.cli import main

main()

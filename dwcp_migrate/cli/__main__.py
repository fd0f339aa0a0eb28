from dwcp_migrate.cli import main

main()

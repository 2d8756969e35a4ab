from ordering_sql.cli import main

if __name__ == "__main__":
    main()

from labfleet.cli import main

if __name__ == "__main__":  # not on import (multiprocessing's spawn imports the main module again)
    main()

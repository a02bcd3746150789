from essaim.cli import app

if __name__ == "__main__":  # not when a coordinator process starts another (multiprocessing imports this)
    app()

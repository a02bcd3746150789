from essaim.cli import app

app()

"""`torchrun ... -m pipeline.train --shards ...`: train-stream's options, without installing the package
(the console script's own entry point, so both parse alike)."""

from pipeline.cli import train_app

if __name__ == "__main__":
    train_app()

"""Entry point: `python -m benchmarks [--quick] [--gpu | --no-gpu] [--skip ...]`."""

from benchmarks.run import main

if __name__ == "__main__":
    main()

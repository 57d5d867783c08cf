"""``python -m scdrugmap``: the ``scdrugmap`` command (`scdrugmap.cli.main`)."""

from scdrugmap.cli import main

if __name__ == "__main__":
    main()

"""``python -m dermcam`` (also what ``torchrun -m dermcam`` runs)."""

from dermcam.cli import main

if __name__ == "__main__":
    main()

"""``torchrun -m nowcast.train CONFIG [--resume]``: the training stage as a module entry point.

The loop itself is :func:`nowcast.training.loop.train`; ``nowcast train`` calls the same function.
"""

from nowcast.training.loop import main

if __name__ == "__main__":
    main()

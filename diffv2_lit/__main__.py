"""`python -m diffv2_lit ...` is the same as the `diffv2-lit` console script."""

from diffv2_lit.cli import main

if __name__ == "__main__":
    main()

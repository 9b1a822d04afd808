"""Prints the table of registered models: ``python -m vit_jax.models [--markdown]``."""

import argparse

from vit_jax.models.summary import model_table

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--markdown', action='store_true', help='a Markdown table (as in the README)')
    print(model_table(markdown=parser.parse_args().markdown))

"""Chat channels, one module each; every module registers its Channel class."""

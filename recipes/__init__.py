"""The study around hf_amnesia: recipes that train, forget and compare with Retrain, and their evaluation.

Part of the repository, not of the installed package. From the repository root:

    python recipes/quickstart.py          # or: python -m recipes.quickstart
    python -m recipes.mnist --help
    python -m recipes.cifar100 --help
"""

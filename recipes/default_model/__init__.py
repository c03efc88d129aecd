"""How the embedded default model was made, and the measurements of its model card.

Run from the repository root (the package itself only ships the trained weights and their loader):

    python -m recipes.default_model.train OUTPUT_DIR        # rebuild the weights from a seed
    python -m recipes.default_model.budgets --json FILE      # accuracy at reduced token budgets
    python -m recipes.default_model.analysis                 # where the kept tokens fall
    python -m recipes.default_model.make_samples             # the bundled sample scenes
"""

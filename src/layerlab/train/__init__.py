"""The training lab: recipes, one training loop, and zoos of models that differ only in how they were trained."""
from .loop import checkpoint_epochs, evaluate, noisy_labels, train
from .recipes import CATEGORIES, RECIPES, Recipe, recipe
from .zoo import Zoo, ZooEntry, load_zoo, train_zoo, zoo_table

__all__ = ["CATEGORIES", "RECIPES", "Recipe", "Zoo", "ZooEntry", "checkpoint_epochs", "evaluate", "load_zoo",
           "noisy_labels", "recipe", "train", "train_zoo", "zoo_table"]

"""Recipes: the commands, each reading top to bottom (torchtune style) over the workbench."""

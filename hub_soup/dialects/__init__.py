"""Other formats a recipe can be written in, read onto the one :class:`~hub_soup.recipe.Recipe` (torch-free)."""

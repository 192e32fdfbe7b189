"""Category text: categories and their registry, built-in corpora, splits and token blocks."""

"""Result reports of every flow (tables, markdown, figures). Presentation only: no compute stage imports this."""

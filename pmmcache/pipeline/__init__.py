"""`pmmcache pipeline`: experiment recipes -> a grid of training runs -> a paper-layout results table.

recipe.py  the recipe format (typed, strictly checked)
runner.py  plans the grid, skips finished runs, resumes unfinished ones, trains the rest
report.py  results.md / results.csv / convergence.png from the finished runs
"""
from pmmcache.pipeline.recipe import Cell, Recipe, load_recipe, parse_recipe, read_recipe_data
from pmmcache.pipeline.report import build_table, write_report
from pmmcache.pipeline.runner import PlannedRun, plan, run_pipeline, run_state

__all__ = ["Cell", "PlannedRun", "Recipe", "build_table", "load_recipe", "parse_recipe", "plan", "read_recipe_data",
           "run_pipeline", "run_state", "write_report"]

"""Recipes: what a run trains on, how batches are made, how it is scored and what it exports. `loop.train` runs any
`Recipe`; `recipe_for` is the one place that decides which one a config asks for.

- `TextRecipe` (text.py): classification and regression on a text task;
- `GenerationRecipe` (generation.py): text generation (data.task e2e, generation), scored on decoded text;
- `ImageRecipe` (image.py): image classification on a vision transformer (data.format imagefolder, npz).

Each class says what it is in `kind` ("text", "generation", "image"), for the commands that take only some kinds.
"""

from __future__ import annotations

from ipt_ds.config import Config, DataConfig
from ipt_ds.data.images import IMAGE_FORMATS
from ipt_ds.data.tasks import Task, get_task
from ipt_ds.recipes.base import Recipe, TokenBatches
from ipt_ds.recipes.generation import GenerationRecipe
from ipt_ds.recipes.image import ImageRecipe
from ipt_ds.recipes.text import TextRecipe

__all__ = ["GenerationRecipe", "ImageRecipe", "Recipe", "TextRecipe", "TokenBatches", "recipe_class", "recipe_for",
           "text_recipe_class"]


def text_recipe_class(task: Task) -> type[TextRecipe]:
    """The recipe of a text task: generation or classification (regression included)."""
    return GenerationRecipe if task.generation else TextRecipe


def recipe_class(data: DataConfig) -> type[TextRecipe] | type[ImageRecipe]:
    """The recipe of the data section: images by their layout (data.format), else by the task."""
    return ImageRecipe if data.format in IMAGE_FORMATS else text_recipe_class(get_task(data.task))


def recipe_for(cfg: Config) -> TextRecipe | ImageRecipe:
    return recipe_class(cfg.data)(cfg)

"""Write the configuration reference: `python -m ipt_ds.configdoc > docs/config.md` (a test keeps it current)."""

from ipt_ds.config import SECTIONS
from ipt_ds.confload import reference_markdown
from ipt_ds.methods import METHODS

HEADER = """# Configuration reference

Generated from the config dataclasses by `python -m ipt_ds.configdoc > docs/config.md`. Every key can be set in the
YAML file or overridden with `--section.key=value`. The `method` section takes `name` and that method's options.
"""


def render() -> str:
    methods = {f"method: {name}": spec.config_cls for name, spec in sorted(METHODS.items())}
    return HEADER + "\n" + reference_markdown(SECTIONS) + "\n" + reference_markdown(methods)


if __name__ == "__main__":
    print(render(), end="")

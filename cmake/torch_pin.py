"""scikit-build-core metadata plugin: pin a wheel's runtime torch to the minor it was built with.

The compiled library is tied to the C++ ABI of the torch it was built against (ftops/_ops.py
refuses another minor at import), so a wheel or an install from source requires
``torch>=X.Y,<X.(Y+1)`` for the torch found at build time; an sdist keeps the supported range
(its builds pin when they compile). Used from pyproject.toml's ``[[tool.dynamic-metadata]]``.
"""
from __future__ import annotations


class TorchPin:
    def __init__(self):
        self.state = "wheel"

    def build_state(self, build_state: str) -> None:
        self.state = build_state

    def dynamic_wheel(self, settings) -> dict:
        return {"dependencies": True}  # an sdist's wheels pin differently

    def dynamic_metadata(self, settings, project) -> dict:
        supported = str(settings.get("supported", ""))
        others = list(settings.get("others", []))
        if self.state == "sdist":
            return {"dependencies": [f"torch{supported}", *others]}
        import torch

        major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
        if supported:
            from packaging.specifiers import SpecifierSet

            if f"{major}.{minor}" not in SpecifierSet(supported):
                raise RuntimeError(f"ftops: torch {torch.__version__} is installed but ftops "
                                   f"supports torch{supported}")
        return {"dependencies": [f"torch>={major}.{minor},<{major}.{minor + 1}", *others]}

"""One distribution, one namespace: kernels/, integration/ and csrc/ ship inside worldkv_connector."""
from setuptools import find_packages, setup

# top-level folder -> the package it becomes inside the one namespace
PACKAGE_DIRS = {
    "worldkv_connector": "worldkv_connector",
    "worldkv_connector.kernels": "kernels",
    "worldkv_connector.integration": "integration",
    "worldkv_connector.csrc": "csrc",
}


def _packages() -> list[str]:
    packages = []
    for name, folder in PACKAGE_DIRS.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(folder)]  # every sub-package of the folder
    return sorted(set(packages))


setup(
    packages=_packages(),
    package_dir=PACKAGE_DIRS,
    package_data={
        "worldkv_connector.csrc": ["*.cu", "*.cuh"],
        # the trained world model (worldkv train world) and its manifest
        "worldkv_connector.world.weights": ["*.safetensors", "*.json"],
    },
)

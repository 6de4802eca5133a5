"""One distribution, one namespace: kernels/, integration/ and csrc/ ship inside worldkv_connector."""
from setuptools import Extension, find_packages, setup

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


# The CPU transfer engine's copy loop and the step planner's run builder (csrc/host_copy.c).
# Optional: without a C compiler the install still succeeds, the engine copies run by run from
# Python and numpy builds every plan (slower; `worldkv_connector.transfer.fragments.HOST_COPY` says
# which copy runs).
HOST_COPY = Extension("worldkv_connector.csrc._host_copy", ["csrc/host_copy.c"], extra_compile_args=["-O2"],
                      extra_link_args=["-pthread"], optional=True)


setup(
    packages=_packages(),
    ext_modules=[HOST_COPY],
    package_dir=PACKAGE_DIRS,
    package_data={
        "worldkv_connector.csrc": ["*.cu", "*.cuh", "*.c"],
        # the trained world model (worldkv train world) and its manifest
        "worldkv_connector.world.weights": ["*.safetensors", "*.json"],
    },
)

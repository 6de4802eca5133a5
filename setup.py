"""One distribution, one namespace: kernels/, integration/ and csrc/ ship inside worldkv_connector."""
from setuptools import setup

setup(
    packages=[
        "worldkv_connector",
        "worldkv_connector.cli",
        "worldkv_connector.bench",
        "worldkv_connector.connector",
        "worldkv_connector.transfer",
        "worldkv_connector.kernels",
        "worldkv_connector.integration",
        "worldkv_connector.integration.video",
        "worldkv_connector.integration.vllm",
        "worldkv_connector.csrc",
    ],
    package_dir={
        "worldkv_connector": "worldkv_connector",
        "worldkv_connector.kernels": "kernels",
        "worldkv_connector.integration": "integration",
        "worldkv_connector.csrc": "csrc",
    },
    package_data={"worldkv_connector.csrc": ["*.cu", "*.cuh"]},
)

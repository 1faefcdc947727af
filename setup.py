from setuptools import find_packages, setup

FID = "pytorch-fid==0.3.0"  # hvae.evaluation patches its inception module: the version tested

setup(
    name="hvae",
    version="0.1.0",
    description="NVAE-style hierarchical VAEs: correct likelihoods, fast, any device, tested.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hvae", "hvae.*"]),
    # the demo's 5,000 MNIST digits (origin and licence: hvae/assets/README.md)
    package_data={"hvae": ["assets/mnist_5k.npz", "assets/README.md"]},
    python_requires=">=3.10",
    install_requires=[
        # the floor is the oldest torch tools/check_torch_floor.sh has passed on
        "torch>=2.10,<2.15",
        "torchvision>=0.25,<0.30",
        "numpy",
        "tensorboard",
        "tqdm",
        "pillow",
    ],
    extras_require={
        "fid": [FID],
        "lmdb": ["lmdb"],          # --dataset lmdb and scripts/make_lmdb.py
        "plots": ["matplotlib"],   # scripts/ablate_kl.py's figures
        "test": ["pytest", FID, "lmdb", "matplotlib"],
    },
)

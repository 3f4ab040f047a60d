from setuptools import find_packages, setup

setup(
    name="ldm-asym",
    version="0.1.0",
    description="Asymmetric VQGAN decoder (Zhu et al. 2023) for Stable Diffusion VAEs, on Lightning 2.x and diffusers",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["ldm_asym", "ldm_asym.*"]),
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision",
        "diffusers>=0.30",
        "transformers",
        "safetensors",
        "pytorch-lightning>=2.2",
        "omegaconf>=2.3",
        "einops",
        "lpips",
        "taming-transformers",
        "scikit-image",
        "pillow",
        "tqdm",
        "huggingface_hub",
        "tensorboard",
        "torch-fidelity",
        "torchmetrics>=1.9",  # SSIM's full-image map, FID / Inception Score with our own network (tested: 1.9)
        "wandb",
        "matplotlib",  # scripts/plot_curves.py
        "litdata>=0.2.40,<0.3",  # ShardDataset: streaming shards (ldm_asym/data/shards.py says why)
    ],
    extras_require={"test": ["pytest", "pytest-timeout"]},
)

"""pi0_ros: run Physical Intelligence's pi0 / pi0.5 policies on ROS 2 robots."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "pi0_ros"
VERSION = "0.1.0"  # keep equal to package.xml <version>

setup(
    name=PACKAGE,
    version=VERSION,
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    # The demo's tiny SentencePiece model (pi0_ros/data/README.md) ships with the package.
    package_data={PACKAGE: ["data/*.model", "data/*.md"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.rviz")),
    ],
    python_requires=">=3.10",
    # torch is deliberately not listed: pip would pick a multi-GB CUDA build where the robot's
    # (JetPack, CPU-only, a given CUDA) torch is wanted; the bootstrap installs torch==2.13.0.
    # rosbags and matplotlib: pi0-ros-replay / pi0-ros-demo read and write bags and plot.
    install_requires=["numpy", "safetensors", "sentencepiece", "pillow", "pyyaml", "rosbags",
                      "matplotlib", "ruckig", "opencv-python-headless", "websockets", "msgpack"],
    extras_require={
        "test": ["pytest", "hypothesis", "onnx", "onnxruntime", "transformers", "protobuf"],
    },
    zip_safe=False,
    maintainer="pi0_ros developers",
    maintainer_email="pi0-ros@example.com",
    description="pi0 / pi0.5 vision-language-action policies on ROS 2",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "pi0-ros-infer = pi0_ros.tools.infer:main",
            "pi0-ros-bench = pi0_ros.tools.bench:main",
            "pi0-ros-replay = pi0_ros.tools.replay:main",
            "pi0-ros-export = pi0_ros.tools.export:main",
            "pi0-ros-demo = pi0_ros.tools.demo:main",
            "pi0-ros-plot-executor = pi0_ros.tools.plot_executor:main",
            "pi0-ros-serve = pi0_ros.tools.serve:main",
            "pi0_policy_node = pi0_ros.ros.node:main",
            "pi0_executor_node = pi0_ros.ros.executor_node:main",
        ],
    },
)

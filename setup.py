"""Everything is declared in setup.cfg; this file only ships the `.pth` that registers the models with lm-eval.

lm-eval 0.4.13 reads no entry points, so an installed `.pth` is the one way for a plain `lm_eval --model
retrieval-head-hf` to find the plugin. The `.pth` imports a tiny module that does nothing until lm-eval's registry
is imported (see lm_eval_retrieval_autoload.py).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "lm_eval_retrieval.pth"


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildWithPth})

"""Adapters that run nnhealth.Monitor inside a training framework's own loop.

* ``nnhealth.integrations.lightning.NnhealthCallback``: a Lightning ``Callback``
  (``pip install 'nnhealth[lightning]'``);
* ``nnhealth.integrations.huggingface.NnhealthTrainerCallback``: a Hugging Face
  ``TrainerCallback`` (``pip install 'nnhealth[hf]'``).

Each framework is imported by its adapter's module only: importing nnhealth, or this
package, imports neither.
"""

"""MONAI Deploy application of the denoiser (issue 5): DICOM series in, a derived DICOM series out.

Modules: ``app`` (``DenoiseApp``, run with ``python -m diffdenoise.deploy.app -i IN -o OUT -m MODEL``),
``operators`` (``DenoiseOperator``, float-preserving; ``DICOMSeriesWriterOperator``), ``model`` and
``dicom`` (the model loader and the series writer; they do not import MONAI Deploy). Needs the ``deploy``
extra: ``pip install -e .[deploy]``. See docs/deploy.md.
"""

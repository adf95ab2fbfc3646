"""Quantization shared by the stages: the PT2E int8 quantizer configuration and quantization-aware training."""

from edgekd.quant.qat import (QAT_BATCH_MAX, QATModel, calibrate, convert_qat, finetune_qat,
                              int8_quantizer, prepare_qat)

__all__ = ["QAT_BATCH_MAX", "QATModel", "calibrate", "convert_qat", "finetune_qat",
           "int8_quantizer", "prepare_qat"]

"""models layer: RT-DETRv2 (ResNet-vd R18/R34/R50/R50-M/R101) on transformers' `RTDetrV2ForObjectDetection`;
sizes in `variants`."""

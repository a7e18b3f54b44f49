"""models layer: D-FINE (HGNetv2 N/S/M/L/X) on transformers' `DFineForObjectDetection`; sizes in `variants`."""

"""Model families, one folder each (phi3_v: Phi-3-vision and Phi-3.5-vision), behind the seam of family.py."""

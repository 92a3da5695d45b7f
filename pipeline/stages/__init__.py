"""The stages, one module each: teach, extract, score, distill, probe and the commands built on them."""

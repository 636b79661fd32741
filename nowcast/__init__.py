"""nowcast: precipitation nowcasting research pipeline.

Radar composites -> CF zarr cube -> normalized patch store -> ConvLSTM -> verification against
pysteps baselines -> maps and CF NetCDF.
"""

__version__ = "0.1.0"

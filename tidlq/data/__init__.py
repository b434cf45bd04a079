"""Images: where they come from (sources) and the split dataset a prepare_data folder holds (dataset)."""

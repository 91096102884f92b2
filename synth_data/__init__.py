"""synth_data"""

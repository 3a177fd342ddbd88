"""The engine contract, the three engine cores' shared loop, and the engine-core process around them."""

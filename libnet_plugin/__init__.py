"""libnet-plugin: library networks (Lee, 2019) for any classifier, behind a pluggy core."""

from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "relay",
    "relay.server.tap",
    "A multiplexing HTTP relay server (Cloud Robotics http-relay-server compatible).",
    "relay",
)

from twisted.application.service import ServiceMaker

funcnodesWorker = ServiceMaker(
    "FuncNodes worker",
    "funcnodes_tw.tap",
    "A FuncNodes worker: node graph over WebSocket and HTTP on one port.",
    "funcnodes-worker",
)

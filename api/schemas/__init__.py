"""Request and response models of the HTTP API (they document each field in ``/openapi.json``)."""

from api.schemas.devices import (
    BulkCreated,
    DeviceCreate,
    DeviceCreated,
    DeviceDetail,
    DeviceList,
    DeviceOut,
    DevicePatch,
    ErrorOut,
    FieldErrorOut,
    FleetOut,
    FleetRow,
    FleetTotals,
    LastTelemetry,
    MqttCredentials,
)

__all__ = [
    "BulkCreated",
    "DeviceCreate",
    "DeviceCreated",
    "DeviceDetail",
    "DeviceList",
    "DeviceOut",
    "DevicePatch",
    "ErrorOut",
    "FieldErrorOut",
    "FleetOut",
    "FleetRow",
    "FleetTotals",
    "LastTelemetry",
    "MqttCredentials",
]

module beekeeper.dev/testpod

go 1.24

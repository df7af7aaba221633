import pytest
import torch
from torch import nn

from asag.engine.optim import build_optimizer, split_parameters


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.neck = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.backbone[0].bias.requires_grad_(False)  # frozen


class Wrapper(nn.Module):  # stands in for DistributedDataParallel (.module)
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_groups_lrs_and_weight_decay():
    net = Net()
    opt = build_optimizer(net, lr=1e-3, backbone_lr=1e-4, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["name"] for g in opt.param_groups] == ["base", "backbone"]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.05]
    base_ids = {id(p) for p in opt.param_groups[0]["params"]}
    backbone_ids = {id(p) for p in opt.param_groups[1]["params"]}
    assert base_ids == {id(p) for p in [*net.neck.parameters(), *net.head.parameters()]}
    assert backbone_ids == {id(net.backbone[0].weight), id(net.backbone[1].weight), id(net.backbone[1].bias)}


def test_frozen_params_skipped_and_names_split():
    split = split_parameters(Net())
    assert split.backbone == ["backbone.0.weight", "backbone.1.weight", "backbone.1.bias"]
    assert split.base == ["neck.weight", "neck.bias", "head.weight", "head.bias"]


def test_wrapped_model_uses_inner_names():
    net = Net()
    opt = build_optimizer(Wrapper(net))
    assert [g["name"] for g in opt.param_groups] == ["base", "backbone"]
    assert [g["lr"] for g in opt.param_groups] == [2e-4, 2e-5]  # spec 9 defaults
    assert opt.param_groups[0]["weight_decay"] == 1e-4


def test_model_without_backbone_has_one_group():
    opt = build_optimizer(nn.Linear(2, 2), lr=0.1)
    assert [g["name"] for g in opt.param_groups] == ["base"]


def test_no_trainable_parameters_rejected():
    net = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError):
        build_optimizer(net)

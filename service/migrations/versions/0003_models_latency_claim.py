"""models: when the baseline latency measurement started, and how many times

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 22:20:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('latency_started_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('latency_attempts', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('latency_attempts')
        batch_op.drop_column('latency_started_at')

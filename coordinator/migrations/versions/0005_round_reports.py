"""round reports kept until their round is decided (the group holding the most tokens wins)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 23:30:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'round_reports',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('round', sa.Integer(), nullable=False),
        sa.Column('worker_id', sa.String(length=64), nullable=False),
        sa.Column('params_digest', sa.String(length=64), nullable=False),
        sa.Column('held_tokens', sa.BigInteger(), nullable=False),
        sa.Column('report', sa.Text(), nullable=False),
        sa.Column('received_at', sa.Double(), nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(['worker_id'], ['workers.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('round', 'worker_id'),
    )
    with op.batch_alter_table('round_reports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_round_reports_round'), ['round'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('round_reports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_round_reports_round'))
    op.drop_table('round_reports')
